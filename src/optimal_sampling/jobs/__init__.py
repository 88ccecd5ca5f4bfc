"""Jobs: prompt files, the resumable output store, and the generate / score / validate / report jobs
and the data-parallel launcher. Options arrive as frozen dataclasses; no argparse here."""
