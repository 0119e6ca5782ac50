"""The worker tier: Celery app and signals, devices, models, inference, GradCAM and overlays."""
