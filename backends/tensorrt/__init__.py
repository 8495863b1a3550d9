"""TensorRT lowering."""
