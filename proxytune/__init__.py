"""proxytune: decoding-time steering of a frozen base model by routed expert pairs."""

from proxytune.engine import ProxyTunedModel, decode
from proxytune.steering import ExpertPair, PromptTemplate, SteeringPlan

__all__ = ["ExpertPair", "PromptTemplate", "ProxyTunedModel", "SteeringPlan", "decode"]
__version__ = "0.1.0"
