"""snr-dist's bundled configs (data only): installed as ``snr_dist/configs`` and found by name
(`snr_dist.bundled`), so ``snr-dist train --config quickstart`` works without a checkout."""
