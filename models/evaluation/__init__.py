"""cryid.models.evaluation: offline measurement: ``cryid eval`` (the CryCeleb reader, the pairs and ward
protocols, their metrics and outputs, the simulated ward rooms and channel) and the embedders it compares
(cryid's ONNX model or speechbrain's reference). The daemon and enrollment never import this package."""
