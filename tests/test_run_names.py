"""Run folder names in a multirun: the axis values, unique per job, usable as file names."""

from dibs.conf import MAX_NAME, run_name

JOB = ["algo=raft", "seed=0", "+grid=raft_vs_raftpp", "experiment=smoke", "+data.source.level_weights=[3,1,1,0,0]"]


def test_a_grid_run_is_named_by_its_axes_in_declared_order():
    argv = ["-m", "+grid=raft_vs_raftpp", "experiment=smoke"]
    assert run_name(JOB, {"algo": "raft,raftpp", "seed": "0,1,2"}, 0, argv) == "algo=raft,seed=0"


def test_a_key_swept_on_the_command_line_joins_the_grid_axes():
    job = [*JOB, "allocation.n_per_prompt=8"]
    argv = ["-m", "+grid=raft_vs_raftpp", "allocation.n_per_prompt=4,8"]
    name = run_name(job, {"algo": "raft,raftpp", "seed": "0,1,2"}, 3, argv)
    assert name == "algo=raft,seed=0,allocation.n_per_prompt=8"


def test_a_plain_sweep_is_named_by_its_swept_keys_only():
    assert run_name(JOB, None, 1, ["-m", "seed=0,1", "experiment=smoke"]) == "seed=0"
    assert run_name(JOB, None, 1, ["-m", "seed=range(3)", "algo=glob(*)"]) == "algo=raft,seed=0"


def test_an_unreadable_command_line_falls_back_to_every_override():
    name = run_name(JOB, None, 1, ["--config-name", "other"])  # 'other' is not an override: not our command
    assert name == "algo=raft,data.source.level_weights=[3,1,1,0,0],experiment=smoke,seed=0"


def test_long_names_are_shortened_with_a_hash_and_stay_distinct():
    a = run_name(["x=" + "a" * 300], None, 0, ["--config-name", "other"])
    b = run_name(["x=" + "a" * 299 + "b"], None, 0, ["--config-name", "other"])
    assert len(a) <= MAX_NAME and len(b) <= MAX_NAME and a != b


def test_no_axis_gives_the_job_number():
    assert run_name(["seed=0"], None, 4, ["-m", "seed=0"]) == "job4"


def test_axes_declared_with_a_plus_name_their_key():
    job = ["++algo.lr=0.001", "seed=0", "+grid=g"]
    assert run_name(job, {"++algo.lr": "0.001,0.002", "seed": "0,1"}, 0, ["-m", "+grid=g"]) == "algo.lr=0.001,seed=0"
