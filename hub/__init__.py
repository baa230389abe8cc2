"""cellwatch hub: model registry, bundle distribution over MQTT, staged rollouts.

See hub/README.md; `cellwatch-hub serve` runs `service.HubService`.
"""
