"""Contracts shared by every cellwatch part (see DESIGN.md): message schemas
(`schemas`, `hubapi`), the states of every state machine (`states`) and every
error-code family (`codes`), the one strict pydantic base (`base`), topic names, the
model bundle format, settings, the one MQTT client wrapper and request/response layer
(`rpc`)."""
