"""Code shared by the four programs: errors, SSE, jobs, HTTP plumbing, paths, inventory."""
