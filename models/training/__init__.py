"""cryid.models.training: offline tools that make a model artifact: ``cryid model train`` (speechbrain
recipe, its parts, the LDA back-end), ``cryid model export`` (speechbrain to ONNX) and ``cryid model
calibrate``. torch and speechbrain are imported lazily, and only here and in evaluation: the daemon and
enrollment never import this package."""
