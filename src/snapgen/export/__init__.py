"""Deployment: ONNX export and an onnxruntime pipeline (``snapgen.export.onnx``)."""
