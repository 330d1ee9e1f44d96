from rbee_fleet.keeper.cli import main

main()
