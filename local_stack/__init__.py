"""The pipeline on this machine: moto + the stack from template.yaml + pollers + local GPU/fal servers."""

from local_stack.notifications import Notification
from local_stack.stack import LocalStack, LocalStackConfig

__all__ = ["LocalStack", "LocalStackConfig", "Notification"]
