"""Training the bundled shapes VLM (dev-only; needs the optional torch extra for training and parity)."""
