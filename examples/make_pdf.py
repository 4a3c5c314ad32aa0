"""Regenerate examples/docs/quillfeather-q7-spec.pdf (a real, two-page PDF) with fpdf2.

The PDF is committed; this script documents how it was made: `.venv/bin/python examples/make_pdf.py`.
"""

from pathlib import Path

from fpdf import FPDF

PAGES = [
    (
        "Quillfeather Q7 Survey Drone: Technical Specification",
        [
            "The Quillfeather Q7 is a survey drone made by Brisken Aerial Works in Tromso, Norway. "
            "It was launched on 21 April 2026.",
            "The Quillfeather Q7 weighs 1.8 kg without its battery and carries a maximum payload of 2.4 kg.",
            "The Q7 flies for up to 47 minutes on one charge of its 6,200 mAh battery. "
            "The battery recharges fully in 70 minutes with the Skarv charging dock.",
            "The maximum flight speed of the Quillfeather Q7 is 68 km/h and its maximum service ceiling "
            "is 4,500 metres above sea level.",
            "The Q7 is rated IP54 for dust and water resistance and operates between -20 and 45 degrees Celsius.",
        ],
    ),
    (
        "Quillfeather Q7: Sensors, Software and Support",
        [
            "The standard camera of the Quillfeather Q7 is the Auk-48, a 48 megapixel camera with a "
            "one-inch sensor.",
            "The Q7 uses the Merlin-RTK positioning module, which gives a horizontal accuracy of 1.5 centimetres.",
            "Flight plans are created in the Fjordline planning software, which runs on Windows and Linux.",
            "The list price of the Quillfeather Q7 is 8,950 euros, including two batteries and a carry case.",
            "Brisken Aerial Works gives a warranty of 3 years on the airframe and 1 year on batteries.",
            "The chief engineer of the Quillfeather programme is Sigrun Haldorsen.",
        ],
    ),
]


def build(path: Path) -> None:
    pdf = FPDF(format="A4")
    pdf.set_title("Quillfeather Q7 Survey Drone: Technical Specification")
    pdf.set_author("Brisken Aerial Works")
    pdf.set_creation_date(__import__("datetime").datetime(2026, 4, 21, tzinfo=__import__("datetime").UTC))
    for title, paragraphs in PAGES:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 15)
        pdf.multi_cell(0, 8, title)
        pdf.ln(4)
        pdf.set_font("Helvetica", size=11)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(3)
    pdf.output(str(path))


if __name__ == "__main__":
    build(Path(__file__).parent / "docs" / "quillfeather-q7-spec.pdf")
