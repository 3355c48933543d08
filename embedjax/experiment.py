"""One assembly of an experiment: config + mesh -> objective, optimizer and schedule, then (given the model
config) the abstract train state, its shardings and the jitted step. The trainer and `embedjax aot` both ask
this module, so what the AOT check compiles is what training runs; export needs only the model's parameters
(`train_step.abstract_model_params`) and builds no optimizer.

    exp = assemble(config, mesh)                       # every config-level check; nothing written anywhere
    abstract, shards = exp.abstract_state(model_cfg)   # nothing allocated: restore target / AOT input
    step = exp.train_step(model_cfg, shards)           # jit, donated state
    batch = exp.batch_spec()                           # the data layer's batch (keys, shapes, shardings)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from embedjax import sharding
from embedjax.config import ConfigDict, ConfigError, validate


@dataclasses.dataclass
class Experiment:
    config: ConfigDict
    mesh: Any
    objective: Callable
    loss_params: dict[str, float]
    tx: Any                      # optax.GradientTransformation
    lr_schedule: Callable        # step -> learning rate (logged by the step)
    lora: Any = None             # embedjax.lora.LoraConfig (rank 0: off)

    def model_params(self, params: dict) -> Any:
        """The model's parameters from a train state's params (LoRA adapters merged in)."""
        from embedjax.train_step import model_params

        return model_params(params, self.lora)

    def abstract_state(self, model_cfg: Any) -> tuple[Any, Any]:
        """(abstract TrainState with shardings, state shardings) on this mesh; nothing allocated."""
        from embedjax.train_step import abstract_train_state

        return abstract_train_state(model_cfg, self.loss_params, self.tx, self.mesh, self.lora)

    def create_state(self, model_cfg: Any, rng: Any, pretrained: Any = None) -> tuple[Any, Any]:
        """(TrainState on the mesh, state shardings): random init or `pretrained` model params."""
        from embedjax.train_step import create_train_state

        return create_train_state(model_cfg, self.loss_params, self.tx, self.mesh, rng, pretrained=pretrained,
                                  lora=self.lora)

    def train_step(self, model_cfg: Any, state_shardings: Any) -> Callable:
        """step(state, batch) -> (state, metrics), jitted with donated state."""
        from embedjax.config import check_model_fit
        from embedjax.train_step import jit_train_step, make_train_step

        check_model_fit(self.config, model_cfg)

        return jit_train_step(make_train_step(model_cfg, self.objective, self.tx,
                                              grad_cache_chunks=self.config.grad_cache_chunks,
                                              lr_schedule=self.lr_schedule, seed=int(self.config.seed),
                                              exit_layers=tuple(self.config.loss.matryoshka_layers),
                                              lora=self.lora),
                              state_shardings, self.mesh)

    def batch_spec(self) -> dict[str, Any]:
        from embedjax.data.pipeline import batch_spec

        return batch_spec(self.config, self.mesh)


def assemble(config: ConfigDict, mesh: Any) -> Experiment:
    """Checks the config (keys, named choices, prompts, the batch split over `mesh`) and builds the objective,
    optimizer and learning-rate schedule. Raises ConfigError (one line) on anything it rejects."""
    from embedjax.data.prompts import config_prompt
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer, schedule

    validate(config)
    try:
        config_prompt(config.data)
    except ValueError as e:
        raise ConfigError(f"config: data.query_prompt / data.document_prompt: {e}") from None
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ConfigError(f"config: batch_size {config.batch_size} is not divisible by the {dp} data-parallel "
                          f"devices of mesh {dict(mesh.shape)}")
    objective, loss_params = make_objective(config.loss, mesh)
    lr = schedule(config.optim.lr, config.num_steps, config.optim.warmup_steps, config.optim.decay,
                  config.optim.end_factor)
    tx = make_optimizer(dict(config.optim), config.num_steps)
    from embedjax.lora import from_config
    try:
        lora = from_config(config)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    return Experiment(config, mesh, objective, loss_params, tx, lr, lora)
