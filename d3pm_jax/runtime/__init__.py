"""Layer 3, where the program meets devices, processes and files: meshes and logical-axis rules (``sharding``),
joining a multi-host job (``multihost``), crash-safe writes (``files``). May import ``_checks`` only."""
