"""DPSGD under another way of starting Horovod: the checks of tests/parallel/checks/init_variants.py."""

import pytest

# alone: it initialises Horovod its own way (hvd.init(comm=MPI.COMM_WORLD), the plugin imported first), so its job
# runs no other check module
pytestmark = [pytest.mark.mpi, pytest.mark.checks("init_variants", sizes=(2,), alone=True)]


@pytest.mark.parametrize("check", ["mpi_comm_world_and_plugin_imported_first"])
def test_init_with_mpi_comm_world_and_plugin_imported_first(result, size):
    assert result["mpi_size"] == size and result["max_abs_diff"] <= 1e-6
