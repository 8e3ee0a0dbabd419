"""Put on ``PYTHONPATH`` by ``raylign.rollout.vllm_compat.install``: only ``sitecustomize`` matters here."""
