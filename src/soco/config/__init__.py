"""Typed configuration: dataclass schema, YAML presets and `section.key=value` overrides."""
