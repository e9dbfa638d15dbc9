"""usclip: adapt CLIP-style vision-language foundation models to medical ultrasound.

Implements Qu et al., "Adapting Vision-Language Foundation Model for Next Generation Medical
Ultrasound Image Analysis", arXiv:2506.08849.
"""

__version__ = "0.1.0"
