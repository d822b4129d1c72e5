"""edge-resume's edge agent: run long ONNX jobs, snapshot them, keep the server current."""

__version__ = "0.1.0"
