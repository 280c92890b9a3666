"""What runs inside the real-OpenZFS test guest: run.sh, the runner, the harness and the cases."""
