"""Export of trained folds to inference runtimes (ONNX Runtime, OpenVINO) and prediction through them."""
