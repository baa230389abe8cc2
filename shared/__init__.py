"""Contracts shared by every cellwatch part: message schemas, topic names, the model
bundle format, settings and the one MQTT client wrapper (see DESIGN.md)."""
