"""What reads a finished output folder: evaluation, the HTML report, the dataset card, export and the run summary."""
