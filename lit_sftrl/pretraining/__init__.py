"""The tiny model's pretraining wing: the skills corpus, its images, base pretraining and the skills
probe."""
