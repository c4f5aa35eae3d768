"""Rules every layer shares: config validation and limits, seed streams, compute accounting, disk-full
handling, standard errors. Imports nothing else of the package."""
