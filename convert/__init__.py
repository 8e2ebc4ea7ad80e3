"""GGUF writers: test-model generators (text model + mmproj pairs) and, later, policy files."""
