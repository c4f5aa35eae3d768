"""Rules every layer shares: config validation and limits, seed streams, compute accounting, disk-full
handling. Imports nothing else of the package."""
