"""`python -m disagg.router.launch_router ...`: the same as the `launch_router` console script."""

from disagg.router.launch import main

if __name__ == "__main__":
    main()
