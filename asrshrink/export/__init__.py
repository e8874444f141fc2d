"""Deployment exports: the transducer as ONNX encoder, decoder and joiner, and their onnxruntime decoding."""

#: ONNX opset of an export unless asked otherwise (onnxruntime 1.14 and later run it).
DEFAULT_OPSET = 17
