"""The config groups, one module per family of YAML groups; config/schema.py assembles them into WronAIConfig."""
