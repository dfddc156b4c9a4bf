"""Stored programs (hdb_jax/programs.py): an exported program with an optax state in its
pytrees survives the disk and computes what the jitted function computes; a damaged
entry is rebuilt, not trusted; keys change with what shapes the program."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hdb_jax import programs


def _step(params, opt_state, batch):
  tx = optax.adamw(1e-2)
  loss, grads = jax.value_and_grad(lambda p: jnp.mean((batch @ p["w"] - 1.0) ** 2))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def _inputs():
  params = {"w": jnp.ones((3, 2)) * 0.1}
  return params, optax.adamw(1e-2).init(params), np.arange(12, dtype=np.float32).reshape(4, 3)


def test_a_stored_program_computes_what_the_function_computes(tmp_path):
  params, opt_state, batch = _inputs()
  programs.register_namedtuples(opt_state)
  store = programs.Store(str(tmp_path))
  exported = {"step": jax.export.export(jax.jit(_step))(params, opt_state, batch)}
  store.save("k1", exported, {"note": "x"})
  assert sorted(os.listdir(tmp_path / "k1")) == ["meta.json", "step" + programs.SUFFIX]
  bundle = store.load("k1")
  assert bundle.meta["note"] == "x" and bundle.meta["programs"] == ["step"]
  step = programs.compile_all(bundle.programs, donate={"step": (0, 1)})["step"]
  got = step(*_inputs())  # waits for the background compile
  assert step.ready_at is not None
  want = jax.jit(_step)(*_inputs())
  jax.tree_util.tree_map(np.testing.assert_allclose, got, want)
  assert isinstance(got[1][0], optax.ScaleByAdamState)  # the state's types come back


def test_absent_or_damaged_entries_are_not_trusted(tmp_path):
  params, opt_state, batch = _inputs()
  programs.register_namedtuples(opt_state)
  store = programs.Store(str(tmp_path))
  assert store.load("missing") is None
  store.save("k2", {"step": jax.export.export(jax.jit(_step))(params, opt_state, batch)}, {})
  (tmp_path / "k2" / ("step" + programs.SUFFIX)).write_bytes(b"not a program")
  assert store.load("k2") is None
  store.save("k2", {"step": jax.export.export(jax.jit(_step))(params, opt_state, batch)}, {})
  assert store.load("k2") is not None  # rebuilt in place
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp folders left


def test_keys_follow_what_shapes_the_programs():
  assert programs.key_of("a", {"rank": 4}) == programs.key_of("a", {"rank": 4})
  assert programs.key_of("a", {"rank": 4}) != programs.key_of("a", {"rank": 8})
  assert len(programs.code_version()) == 16
