"""The paper configs: each names its published figure, how to prepare its data, its hardware and time and its
deviations; the data its own d3pm-prepare command makes (here from the fake corpora the data tests build) is what
the config reads; and MD4's "no clipping" is a real setting."""
import dataclasses
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d3pm_jax.config import NOT_IN_REFERENCE, TrainConfig, from_config
from d3pm_jax.data import pipeline, prepare
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.training import state, train

from test_prepare import SPLITS
from test_train import ROOT

TARGETS = {
    "lm1b_d3pm:absorbing": "<= 76.9",
    "lm1b_d3pm:uniform": "<= 137.9",
    "lm1b_d3pm:nearest_neighbor": "<= 149.5",
    "lm1b_mdlm": "<= 27.04 after 33B tokens",
    "owt_md4_small": "<= 22.13",
    "text8_md4": "<= 1.37 bits per",
    "lm1b_bd3lm": "<= 28.23",
    "owt_bd3lm": "<= 20.73",
}


def _load(spec):
  name, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.__doc__, module.get_config(arg or None)


def _prepare_flags(doc):
  """The --flag=value pairs of the docstring's d3pm-prepare command (backslash continuations joined)."""
  command = re.search(r"d3pm-prepare ((?:[^\n]*\\\n)*[^\n]*)", doc).group(1).replace("\\\n", " ")
  return dict(re.findall(r"--(\w+)=(\S+)", command))


@pytest.mark.parametrize("spec", sorted(TARGETS))
def test_the_docstring_names_the_target_commands_hardware_and_deviations(spec):
  doc, cfg = _load(spec)
  arg = spec.partition(":")[2]
  assert re.search((re.escape(arg) + r"\s+" if arg else "") + r"target[^.]*?" + re.escape(TARGETS[spec]),
                   " ".join(doc.split())), TARGETS[spec]
  for needed in ("d3pm-prepare", "d3pm-train --config=configs/" + spec.split(":")[0] + ".py", "Hardware and time",
                 "Deviations from the paper"):
    assert needed in doc, needed
  assert _prepare_flags(doc)["dataset"] == cfg.data.name
  assert re.search(r"d3pm-eval ", doc), "the docstring names the command that reads the published figure"


@pytest.mark.parametrize("spec", sorted(TARGETS))
def test_the_data_its_prepare_command_makes_is_what_the_config_reads(tmp_path, spec, fake_lm1b, text8_zip, owt):
  doc, cfg = _load(spec)
  flags = _prepare_flags(doc)
  out, seq_len = str(tmp_path / "prepared"), cfg.data.seq_len
  if flags["dataset"] == "lm1b":
    root, _, vocab = fake_lm1b
    extra = {"tokenizer_path": vocab} if "tokenizer_path" in flags else {"vocab_size": 320}
    if "packing" in flags:
      extra["packing"] = flags["packing"]
    prepare.prepare_lm1b(out, flags["setup"], manual_dir=str(root / "extracted"), seq_len=seq_len, **extra)
  elif flags["dataset"] == "text8":
    prepare.prepare_text8(text8_zip[0], out, seq_len=seq_len, split_chars=SPLITS)
  else:
    root, docs = owt
    # The fake's twelve documents make two rows of 1024; forty copies of them make enough rows for MD4's split
    # (held out here at 50% rather than 2%, so that the fake's validation split is not empty).
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 40))
    validation = flags.get("validation", "documents")
    metadata = prepare.prepare_openwebtext([str(corpus)], str(root / "tokenizer.json"), out, seq_len=seq_len,
                                           validation_documents=2, validation=validation, validation_permille=500)
    assert metadata["source"]["validation"] == validation
  data_cfg = dataclasses.replace(from_config(cfg, 256).data, prepared_dir=out)
  data = pipeline.build_data(data_cfg, batch_size=2, seed=0)  # refuses another data set, length or tokenizer
  assert data.tokenizer.name == cfg.data.tokenizer and data.val_windows.shape[1] == seq_len
  experiment = from_config(cfg, data.tokenizer.vocab_size)
  assert experiment.model.max_len >= seq_len and experiment.process.name == cfg.process.name
  # One train step and one evaluation step on that data with every field of the config but the network's size
  # (its dropout, gate, init, process, loss, schedule and optimiser included): the loss is finite and the steps
  # move the weights, and the evaluation (dropout off) is deterministic.
  cfg.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64, cond_dim=16, dtype="float32",
                   vocab_pad_multiple=1)
  cfg.train.update(batch_size=2)
  if cfg.process.name == "nearest_neighbor":
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(data.tokenizer.vocab_size, 4)))
    cfg.process.update(nn_embeddings=str(tmp_path / "emb.npy"), nn_uniform_rate=0.1)
  small = dataclasses.replace(from_config(cfg, data.tokenizer.vocab_size), data=data_cfg)
  model, process = Transformer(small.model), state.process_for(small)
  optimizer = state.make_optimizer(small.train)
  start = state.init_state(small, model, optimizer)
  windows, weights = jnp.asarray(data.val_windows[:2]), jnp.asarray(data.val_weights[:2])
  segments = None if data.val_segments is None else jnp.asarray(data.val_segments[:2])
  batch = windows if segments is None else (windows, segments)  # the fake OWT's train split has no full batch
  step = jax.jit(train.make_train_step(small, model, process, optimizer))
  after = start
  for _ in range(2):  # the first update's learning rate is 0 (warm-up from 0)
    after, metrics = step(after, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), after.params, start.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  eval_step = jax.jit(train.make_eval_step(small, model, process))
  nats = [np.asarray(eval_step(after.params, jax.random.PRNGKey(1), windows, weights, segments)) for _ in range(2)]
  assert np.all(np.isfinite(nats[0])) and np.array_equal(nats[0], nats[1])


def test_grad_clip_zero_means_no_clipping():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.array([3e5, -4e5, 1e-3])}
  config = TrainConfig(steps=10, warmup_steps=1, grad_clip=0.0, weight_decay=0.0)
  unclipped = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, 1, 10,
                                                             config.learning_rate * config.min_lr_ratio),
                          b1=config.b1, b2=config.b2, weight_decay=0.0)
  ours = state.make_optimizer(config)
  ours_state, ref_state = ours.init(params), unclipped.init(params)
  for _ in range(2):  # the first step has learning rate 0 (warm-up from 0)
    ours_update, ours_state = ours.update(grads, ours_state, params)
    ref_update, ref_state = unclipped.update(grads, ref_state, params)
  assert np.abs(np.asarray(ours_update["w"])).min() > 0
  np.testing.assert_allclose(ours_update["w"], ref_update["w"], rtol=1e-6)
  with pytest.raises(ValueError, match=r"train.grad_clip must be >= 0 \(0: no clipping\); got -1"):
    TrainConfig(grad_clip=-1.0)


# ---------------------------------------------------------------- fidelity to the references

# Fields that say how or where a run computes, logs and saves, never what it optimises or the figure it reports:
# kernels and layout (the same network and loss, tests/test_kernel_sharding.py and test_compiled_step.py), the
# vocabulary's padding rows (cut off the logits), caches' length (rotary positions have no table), accumulation
# (the same gradient), paths, and the periodic log/eval/checkpoint/sample cadence (the figure is d3pm-eval's).
EXECUTION = frozenset({
    "model.attention_impl", "model.head_impl", "model.head_tile", "model.kernel_interpret", "model.remat",
    "model.scan_layers", "model.vocab_pad_multiple", "model.max_len",
    "data.prepared_dir", "data.tokenizer_path",
    "train.grad_accum", "train.grad_reduce_dtype", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.num_samples", "train.sample_steps", "train.seed",
    "train.preemption_grace_s", "train.max_consecutive_skips",
    "process.nn_embeddings"})
SECTIONS = ("model", "data", "train", "process")
PAPER = ("lm1b_d3pm:absorbing", "lm1b_d3pm:uniform", "lm1b_d3pm:nearest_neighbor", "lm1b_mdlm", "lm1b_bd3lm:4",
         "lm1b_bd3lm:8", "lm1b_bd3lm:16", "owt_md4_small", "owt_bd3lm", "text8_md4")


def _inert(cfg) -> set[str]:
  """The fields this config's run never reads, for its loss, process and data (``training/state.py``,
  ``data/pipeline.py``): the discrete-time loss's steps and hybrid weight, the nearest-neighbour graph, the clipped
  window (masked loss only), the time embedding's width without time conditioning, ``ignore_bos`` without blocks,
  the cosine's floor under the
  inverse square root, and the fields of data made at
  run time (stdlib, markov) when the config reads prepared data."""
  inert = set()
  if cfg.process.loss != "d3pm":
    inert |= {"process.num_steps", "process.hybrid_lambda"}
  if cfg.process.name != "nearest_neighbor":
    inert |= {"process.nn_k", "process.nn_rate_scale", "process.nn_uniform_rate"}
  if cfg.process.loss != "masked":
    inert |= {"process.clip_low", "process.clip_high", "process.clip_search", "process.block_size"}
  if not cfg.model.time_conditioning:
    inert.add("model.cond_dim")
  if not cfg.process.block_size:  # refused without block diffusion: always False there
    inert.add("data.ignore_bos")
  if cfg.train.lr_schedule == "inverse_sqrt":
    inert.add("train.min_lr_ratio")
  if cfg.data.name not in ("stdlib", "markov"):
    inert |= {"data.spm_vocab_size", "data.validation_permille"}
  if cfg.data.name != "markov":
    inert |= {"data.markov_states", "data.markov_windows"}
  return inert


def _flat(cfg) -> dict:
  return {f"{section}.{key}": value for section in SECTIONS for key, value in cfg[section].items()}


def _load_reference(spec):
  name, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.__doc__, module.get_config(arg or None), module.reference(arg or None)


def _deviations(doc):
  """The bullets of the docstring's "Deviations from the paper" section."""
  section = doc.split("Deviations from the paper:")[1]
  return [" ".join(b.split()) for b in re.split(r"\n  - ", "\n" + section) if b.strip()]


def fidelity_problems(doc, cfg, reference) -> list[str]:
  """Where ``cfg`` and its docstring disagree with ``reference`` (the config module's record of its reference's
  values): every field the run reads (all of its sections' fields, less ``EXECUTION`` and ``_inert``) must be
  recorded, and no other; each recorded field the config sets otherwise (``NOT_IN_REFERENCE`` always does) must be
  named in backquotes by a deviation bullet, and no bullet may name a recorded field that agrees; every bullet says
  its expected effect."""
  flat = _flat(cfg)
  compared = set(flat) - EXECUTION - _inert(cfg)
  problems = []
  if compared - set(reference):
    problems.append(f"the reference record lacks {sorted(compared - set(reference))}")
  if set(reference) - compared:
    problems.append(f"the reference record sets fields this run does not read: {sorted(set(reference) - compared)}")
  same = lambda a, b: a == b or (isinstance(b, float) and not isinstance(a, str) and bool(np.isclose(a, b)))
  differs = {f for f in compared & set(reference)
             if reference[f] == NOT_IN_REFERENCE or not same(flat[f], reference[f])}
  bullets = _deviations(doc)
  named = {f for b in bullets for f in re.findall(r"`([a-z]+\.[a-z_0-9]+)`", b) if f in compared}
  if differs - named:
    problems.append(f"differs from the reference without a deviation bullet: "
                    f"{ {f: (flat[f], reference[f]) for f in sorted(differs - named)} }")
  if named - differs:
    problems.append(f"deviation bullets name fields that agree with the reference: {sorted(named - differs)}")
  problems += [f"a bullet without its expected effect: {b[:80]}..." for b in bullets if "Expected effect:" not in b]
  return problems


@pytest.mark.parametrize("spec", PAPER)
def test_the_docstring_lists_exactly_the_fields_that_differ_from_the_reference(spec):
  """Every field the run reads is compared with the config's own record of its reference (``reference()`` in the
  config module), derived from the config's sections rather than a hand-made list: a field changed silently, a
  field added to the library and not recorded, or a stale deviation bullet, fails here. The published figure is
  read with the weights the reference evaluates: ``--ema`` in the d3pm-eval command exactly when the reference
  keeps an EMA."""
  doc, cfg, reference = _load_reference(spec)
  assert not fidelity_problems(doc, cfg, reference), fidelity_problems(doc, cfg, reference)
  uses_ema = bool(re.search(r"d3pm-eval [^\n]*--ema", doc))
  assert uses_ema == (reference["train.ema_decay"] not in (0.0, NOT_IN_REFERENCE)), \
      "the eval command must read the weights the reference reports (--ema exactly when it keeps an EMA)"


@pytest.mark.parametrize("spec, field, value", [
    ("lm1b_bd3lm:4", "train.learning_rate", 1e-3), ("owt_md4_small", "model.norm", "rms"),
    ("text8_md4", "model.mlp_activation", "gelu"), ("lm1b_mdlm", "model.attention_dropout", 0.1),
    ("lm1b_d3pm:uniform", "process.hybrid_lambda", 0.01), ("owt_bd3lm", "process.clip_search", False)])
def test_a_silently_changed_field_fails_the_fidelity_check(spec, field, value):
  """The mutations a reviewer named (and three more): each is caught by ``fidelity_problems``, and naming the
  field in a bullet with its expected effect is what makes the check pass again. (owt_md4_small's norm is now
  MD4's LayerNorm, so its mutation is to RMSNorm.)"""
  doc, cfg, reference = _load_reference(spec)
  section, key = field.split(".")
  assert cfg[section][key] != value
  cfg[section][key] = value
  problems = fidelity_problems(doc, cfg, reference)
  assert problems and field in problems[0], problems
  declared = doc.replace("Deviations from the paper:", f"Deviations from the paper:\n  - `{field}` changed. "
                                                       f"Expected effect: a test's.", 1)
  assert not fidelity_problems(declared, cfg, reference)


def test_the_readme_fidelity_table_lists_every_config_and_its_field_deviations():
  """The README's fidelity table has a row per paper config naming every recorded field its docstring lists as a
  deviation."""
  readme = (ROOT / "README.md").read_text()
  section = readme.split("### Fidelity to the references")[1].split("\n\n")
  table = next(block for block in section if block.startswith("| config |"))
  for spec in PAPER:
    name = spec.split(":")[0]
    row = next((line for line in table.splitlines() if f"`configs/{name}.py" in line), None)
    assert row is not None, name
    doc, _, reference = _load_reference(spec)
    for field in {f for b in _deviations(doc) for f in re.findall(r"`([a-z]+\.[a-z_0-9]+)`", b) if f in reference}:
      assert f"`{field}`" in row, (name, field)
