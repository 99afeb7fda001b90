"""Inference backends, one module per runtime; `edged.engine.backend.BACKENDS` maps
`model.type` to them."""
