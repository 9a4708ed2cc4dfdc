"""What tests, benchmarks and the tiny configs build models from: random weights, tiny models in every
file format, a tiny tokenizer (`tiny`), and the comparison with diffusers (`parity`). The library never
imports it, except for training's and the toy world's random initialisation (`random_params`)."""
