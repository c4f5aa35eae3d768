"""Tasks (environments and their variants) and the DataModules that emit episodes and SFT samples."""
