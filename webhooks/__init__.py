"""The webhook worker: delivers signed events from the ``webhooks`` queue, far from any GPU."""
