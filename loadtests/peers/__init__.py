"""Our services against the servers a user would pick instead, on the same ONNX files: see __main__.py."""
