from rbee_fleet.queen.main import main

main()
