"""Typed configuration: dataclass schema with the rules of every value, YAML presets and `section.key=value` overrides."""
