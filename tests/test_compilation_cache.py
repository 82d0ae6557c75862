"""rljax.runs.use_compilation_cache: the experiments' persistent compilation cache switch."""

import jax

from rljax import runs


def test_use_compilation_cache_sets_a_folder_once(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert runs.use_compilation_cache(None) is None
        assert jax.config.jax_compilation_cache_dir is None
        folder = tmp_path / "cache"
        assert runs.use_compilation_cache(str(folder)) == str(folder)
        assert folder.is_dir() and jax.config.jax_compilation_cache_dir == str(folder)
        # Already configured (JAX_COMPILATION_CACHE_DIR, a test suite, an earlier call): kept.
        assert runs.use_compilation_cache(str(tmp_path / "other")) == str(folder)
        assert not (tmp_path / "other").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
