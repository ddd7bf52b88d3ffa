"""Where users already train: Hugging Face (`transformers`, `accelerate`), Lightning, and the
telemetry they log through. Each integration imports its library lazily, so ``snr_dist``
installs and imports without any of them (extras ``hf``, ``lightning``, ``tensorboard``)."""
