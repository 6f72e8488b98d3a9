"""The thin Hydra-RLHF stack: config, data, Hydra-SFT, rollout, variants, advantages, losses, the PPO step, the
critic-free step (GRPO and friends), reward sources.

Public API (stable; the CLI and the python/ recipes build on it):

config     SFTConfig, PPOConfig, GRPOConfig (+ sections ModelConfig, LoRAConfig, DataConfig, RunConfig);
           load_config(cls, path=None, overrides=()) — defaults < JSON/YAML file < dotted "key=value" pairs;
           apply_overrides(cfg, pairs); config_to_dict / config_from_dict; save_config(cfg, path).
data       load_sft_data / load_preference_data / load_prompt_data: TRL's standard and conversational formats from
           JSONL/JSON/parquet/CSV files, save_to_disk directories, datasets.Dataset or lists of dicts (ValueError
           "<file>:<row>: field ..."); load_*_jsonl are the same readers,
           SFTExample, PreferencePair, check_tokenizer, add_pad_token, tokenize_* and collate helpers.
sft        hydra_sft(model, tokenizer, demonstrations, pairs, cfg, *, eval_pairs=None, eval_demonstrations=None,
                     callback=None) -> SFTResult(model, reward_head, metrics, history, output_dir)
           `model` is a plain transformers causal LM; the result's model holds the SFT weights in its base
           (mode "lora" merges the adapter and returns an unpatched model), reward_head is nn.Linear(hidden, 1).
           evaluate_pairs(model, reward_head, tokenizer, pairs, cfg) -> {"lm_loss", "reward_accuracy",
           "reward_margin"}; evaluate_demonstrations(model, tokenizer, demos, cfg) -> {"lm_loss"};
           save_sft(out_dir, result, tokenizer=None, cfg=None) / load_sft(dir) ->
           (model, reward_head). With run.output_dir set, hydra_sft writes <output_dir>/final itself.
ppo        train_ppo(model, reward_head, tokenizer, prompts, cfg, *, reward_fn=None, gold_reward_fn=None,
                     callback=None) -> PPOResult(models, history, counters, output_dir)
           model/reward_head: the SFT result (reward_head None: a plain causal LM trained on reward_fn, the value
           head starting fresh). hydra / j-hydra patch `model` IN PLACE (LoRA off = the SFT model);
           lora / full keep it as the frozen reference + 3 copies. reward_fn(prompts, completions, ended) -> floats (ended:
           the completion stopped at EOS) drives PPO when cfg.reward_source == "function"; gold_reward_fn (same
           signature) is only logged (objective/gold_reward). callback(step, metrics) after every step.
           Writes <output_dir>/<metrics_file> (JSONL, one line per step; TRL's metric names, ppo.TRL_METRICS),
           checkpoints/ (resume), final/ (save_policy; load_policy(dir, models)).
           result.models.export_policy(dir, tokenizer) writes the policy of any variant as a plain HF directory;
           for shared variants result.models.hydra is an integrations.HydraModel.
grpo       train_grpo(model, tokenizer, prompts, cfg, *, reward_fn=None, reward_head=None, gold_reward_fn=None,
                      callback=None) -> GRPOResult(models, history, counters, output_dir)
           critic-free RL (cfg.estimator: grpo, dr_grpo, dapo, rloo, reinforce_pp, reinforce_pp_baseline; presets
           in rlhf.estimators) on one base with one adapter, the reference = the base stream; `model` (a Hydra-SFT
           result or a plain causal LM) is patched IN PLACE. prompts: strings or {"prompt", ...} rows.
rewards    reward sources for PPO and GRPO: reward functions (PPO's (prompts, completions, ended) or TRL's
           f(prompts, completions, **kwargs)), several weighted (reward_weights), a reward model directory
           (reward_model=DIR, RewardModel), or the Hydra-SFT reward head; load_reward_fn("mod:fn" | "file.py:fn").
variants   build_ppo_models(model, reward_head, cfg) -> models.PPOModels, one small object per variant
           (HydraPPO, JHydraPPO, LoRAPPO, FullPPO): .policy("actor"|"reference"), .named_trainable(),
           .roles(), .score(rollout, *, temperature, kl_estimator) -> scoring.Scores (old/ref log-probs, KL,
           entropy, values, scores), .forward(rollout, *, temperature, need_entropy, roles) (the update's, with
           grad, of the roles asked for: "actor", "critic").
models     load_model_and_tokenizer(cfg.model); new_reward_head(model) (integrations.hydra_model's).
rollout    generate(models.policy(...), prompt_ids, prompt_mask, *, max_new_tokens, eos_token_id, pad_token_id,
           temperature, top_p, generator) -> Rollout;
           sample_completions(models, tokenizer, prompts, *, policy="actor"|"reference", max_new_tokens,
           temperature=1.0 (0 = greedy), top_p=1.0, seed=0, batch_size=64, max_prompt_len=128)
           -> (completions, ended). "reference" is the SFT policy (LoRA off / the frozen copy).
advantages shape_scores, per_token_rewards, gae, whiten, masked_mean, FixedKLController, AdaptiveKLController.
losses     policy_loss, value_loss, entropy_bonus, ppo_loss.
run        Run: the run scaffold hydra_sft and train_ppo share (output dir, resume, metrics, progress, final).
logging    MetricsLogger: run.report_to's reporters besides the JSONL (csv, tensorboard, wandb), used by Run.
checkpoint save_checkpoint / load_checkpoint / latest_checkpoint (safetensors + JSON, atomic);
           save_policy(dir, models, cfg) / load_policy(dir, models): PPO's result.
"""
from hydra_kernels.integrations.hydra_model import new_reward_head
from hydra_kernels.rlhf.advantages import (AdaptiveKLController, FixedKLController, gae, masked_mean,
                                           per_token_rewards, shape_scores, whiten)
from hydra_kernels.rlhf.config import (DataConfig, GRPOConfig, LoRAConfig, ModelConfig, PPOConfig, RunConfig,
                                       SFTConfig, apply_overrides, config_from_dict, config_to_dict, load_config,
                                       parse_overrides, save_config)
from hydra_kernels.rlhf.estimators import ESTIMATORS
from hydra_kernels.rlhf.data import (PreferencePair, PromptData, SFTExample, add_pad_token, check_tokenizer,
                                     load_preference_data, load_preference_jsonl, load_prompt_data,
                                     load_prompt_jsonl, load_sft_data, load_sft_jsonl)
from hydra_kernels.rlhf.losses import entropy_bonus, policy_loss, ppo_loss, value_loss
from hydra_kernels.rlhf.checkpoint import load_policy, save_policy
from hydra_kernels.rlhf.models import PPOModels, load_model_and_tokenizer
from hydra_kernels.rlhf.ppo import PPOResult, train_ppo
from hydra_kernels.rlhf.grpo import GRPOResult, train_grpo
from hydra_kernels.rlhf.rewards import RewardModel, load_reward_fn
from hydra_kernels.rlhf.rollout import Rollout, generate, sample_completions
from hydra_kernels.rlhf.scoring import Scores
from hydra_kernels.rlhf.variants import VARIANTS, CriticFree, build_critic_free, build_ppo_models
from hydra_kernels.rlhf.sft import SFTResult, evaluate_demonstrations, evaluate_pairs, hydra_sft, load_sft, save_sft

__all__ = ["SFTConfig", "PPOConfig", "GRPOConfig", "ESTIMATORS", "ModelConfig", "LoRAConfig", "DataConfig",
           "RunConfig", "load_config",
           "apply_overrides", "parse_overrides", "config_from_dict", "config_to_dict", "save_config",
           "SFTExample", "PreferencePair", "PromptData", "load_sft_data", "load_preference_data", "load_prompt_data",
           "load_sft_jsonl", "load_preference_jsonl", "load_prompt_jsonl",
           "check_tokenizer", "add_pad_token",
           "hydra_sft", "SFTResult", "evaluate_pairs", "evaluate_demonstrations", "save_sft", "load_sft",
           "train_ppo", "PPOResult", "save_policy", "load_policy", "train_grpo", "GRPOResult",
           "CriticFree", "build_critic_free", "RewardModel", "load_reward_fn",
           "PPOModels", "build_ppo_models", "VARIANTS", "new_reward_head", "load_model_and_tokenizer",
           "Rollout", "generate", "sample_completions", "Scores",
           "shape_scores", "per_token_rewards", "gae", "whiten", "masked_mean", "FixedKLController", "AdaptiveKLController",
           "policy_loss", "value_loss", "entropy_bonus", "ppo_loss"]
