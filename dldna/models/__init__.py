"""Models: shared layers, the AG News encoder, simple Mistral and Phi-3, MoE, and generation.

Each module adds its public names here with one ``from .module import ...`` line.
"""
from dldna.models.layers import GatedMLP, GeGLU, LearnedPositionalEmbedding, RMSNorm, RotaryEmbedding, SinusoidalPositionalEmbedding, SwiGLU, alibi_bias, alibi_slopes, apply_rotary_pos_emb, rotate_half, sinusoidal_position_encoding
from dldna.models.cache import KVCache
from dldna.models.generation import CausalLMOutput, generate
from dldna.models.mistral import MistralConfig, MistralForCausalLM, MistralModel
from dldna.models.phi3 import Phi3Config, Phi3ForCausalLM, Phi3Model, Phi3Output
from dldna.models.encoder import ClassifierOutput, Encoder, EncoderClassifier, EncoderConfig, EncoderForMaskedLM, mask_tokens
from dldna.models.moe import MoEConfig, MoEForCausalLM, MoEModel, SparseMoeBlock, load_balancing_loss, moe_parameter_counts, router_z_loss
from dldna.models.speculative import SpeculativeOutput, speculative_generate
from dldna.models.mtp import MultiTokenPredictionLM, mtp_generate
