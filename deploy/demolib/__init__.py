"""The pieces of deploy/demo.py (`make demo`, `make up`, `make down`)."""
