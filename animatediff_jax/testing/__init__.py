"""What tests, benchmarks and the tiny configs build models from: tiny models in every file format and
random LoRAs (`tiny`), tiny CLIP and safety-checker folders (`tiny_clip`). No library module imports it
(tests/test_layout.py checks): random initialisation is `models.init`, the comparison with diffusers
the `parity` command (`animatediff_jax/parity.py`)."""
