"""The runtime: requests, the Scheduler, the OptimalSampler facade, scoring, live weight updates and
the sampling service a server runs. Imported lazily through `optimal_sampling.OptimalSampler`."""
