"""Put on ``PYTHONPATH`` by ``raylign.models.torchvision_free.install``: only ``sitecustomize`` matters here."""
