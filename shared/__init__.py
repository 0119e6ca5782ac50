"""The contract that web/ and worker/ both import: settings, errors, keys, task names, job schema."""
