fn main() {
    println!("chinwag");
}
