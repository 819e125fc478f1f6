"""Pure parts of the RL stage (DiPO / GTPO, DESIGN section 2): rewards, advantages, sampling, loss, replay.

Nothing here imports Megatron; the sampler, the model and the training loop call these.
"""
from .advantages import group_advantages
from .dynamic_sampling import DynamicSamplingConfig, SamplingResult, SamplingStats, dynamic_sample, is_informative
from .ppo import PPOConfig, PPOTerms, k3_kl, ppo_loss, token_entropy, token_logprobs
from .rewards import RewardConfig, RewardFunction, RewardTerms, format_reward, speed_reward, tokens_per_step
from .trajectory import StepView, TrajectoryInputs, build_trajectory_inputs, step_views
from .verifier import MathVerifier, VerifierConfig, extract_boxed_answer, normalize_answer, verify_answer

__all__ = [
    "group_advantages",
    "DynamicSamplingConfig", "SamplingResult", "SamplingStats", "dynamic_sample", "is_informative",
    "PPOConfig", "PPOTerms", "k3_kl", "ppo_loss", "token_entropy", "token_logprobs",
    "RewardConfig", "RewardFunction", "RewardTerms", "format_reward", "speed_reward", "tokens_per_step",
    "StepView", "TrajectoryInputs", "build_trajectory_inputs", "step_views",
    "MathVerifier", "VerifierConfig", "extract_boxed_answer", "normalize_answer", "verify_answer",
]
