"""Device profiles shipped with edgefleet: one TOML file per device class (data, not code)."""
