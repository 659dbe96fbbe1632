"""A run's directory and identity: file names, claiming and marking, resume, finished runs, sweeps."""
